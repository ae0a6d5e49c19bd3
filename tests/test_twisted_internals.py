"""Each reliance on a private Twisted name, exercised against the installed Twisted.

The fences (``web/twisted_internals.py``, ``service/twisted_internals.py``) are
the only modules that use Twisted's private names (``tests/test_twisted_fence.py``).
Here each of their functions is checked against real Twisted objects, so that a
Twisted release that renames or changes what one relies on fails here, naming
the reliance.  ``.ci/oldest-newest`` runs these tests on the oldest supported
Twisted as well as on the newest.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import EncodingResourceWrapper, Resource
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory, Request, Site
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyChannel, DummyRequest
from zope.interface import implementer

from twisted_httpwasm.service import twisted_internals as service_internals
from twisted_httpwasm.web import twisted_internals as web_internals


class _Slow(Resource):
    """Answers later: the test finishes the request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


def _channel(channel_class: type[HTTPChannel] = HTTPChannel) -> tuple[HTTPChannel, StringTransport, _Slow]:
    resource = _Slow()
    site = Site(resource, reactor=Clock())
    channel = channel_class()
    channel.site = site
    channel.requestFactory = site.requestFactory
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, resource


class WebInternalsTests(SynchronousTestCase):
    def test_escape_log_field(self) -> None:
        """``http._escape``: a log field escaped as the combined log format escapes one."""
        self.assertEqual(web_internals.escape_log_field('a"b\n\x01'), 'a\\"b\\n\\x01')
        self.assertEqual(web_internals.escape_log_field(b"/p\xff"), "/p\\xff")

    def test_request_disconnected(self) -> None:
        """``Request._disconnected``: False while connected, True once the connection is lost."""
        request = Request(DummyChannel())
        self.assertFalse(web_internals.request_disconnected(request))
        request.connectionLost(Exception("gone"))
        self.assertTrue(web_internals.request_disconnected(request))
        self.assertFalse(web_internals.request_disconnected(object()))

    def test_watch_finish(self) -> None:
        """``Request.notifications``: a watcher hears callback(None) on finish, errback(reason) on a lost connection."""

        class Watcher:
            def __init__(self) -> None:
                self.told: list[tuple[str, Any]] = []

            def callback(self, result: None) -> None:
                self.told.append(("callback", result))

            def errback(self, reason: Any) -> None:
                self.told.append(("errback", reason))

        channel, _, resource = _channel()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        finished, finished_watcher = resource.requests[0], Watcher()
        web_internals.watch_finish(finished, finished_watcher)
        also = finished.notifyFinish()  # alongside notifyFinish's own Deferreds
        finished.write(b"ok")
        finished.finish()
        self.assertEqual(finished_watcher.told, [("callback", None)])
        self.assertIsNone(self.successResultOf(also))

        channel.dataReceived(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        lost, lost_watcher = resource.requests[1], Watcher()
        web_internals.watch_finish(lost, lost_watcher)
        channel.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual([what for what, _ in lost_watcher.told], ["errback"])
        reason = lost_watcher.told[0][1]
        self.assertIsInstance(reason, Failure)
        self.assertIsInstance(reason.value, ConnectionError)

        # twisted.web's DummyRequest has no notifications list: watched through notifyFinish.
        for ending in ("finish", "lost"):
            dummy, watcher = DummyRequest([b"x"]), Watcher()
            web_internals.watch_finish(dummy, watcher)
            if ending == "finish":
                dummy.finish()
                self.assertEqual(watcher.told, [("callback", None)])
            else:
                dummy.processingFailed(Failure(ConnectionError("gone")))
                self.assertEqual([what for what, _ in watcher.told], ["errback"])

    def test_raw_header_map(self) -> None:
        """``Headers._rawHeaders``: looked up by the stored name, it holds what getRawHeaders returns."""
        for name in (b"connection", b"content-length", b"x-custom"):
            stored = web_internals.stored_header_name(name)
            self.assertEqual(stored.lower(), name)
            for spelled in (name, name.upper(), name.title()):
                headers = Headers()
                self.assertFalse(web_internals.raw_header_map(headers).get(stored))
                headers.setRawHeaders(spelled, [b"a", b"b"])
                self.assertEqual(web_internals.raw_header_map(headers).get(stored), headers.getRawHeaders(name))
                headers.addRawHeader(spelled, b"c")
                self.assertEqual(web_internals.raw_header_map(headers).get(stored), [b"a", b"b", b"c"])
                headers.removeHeader(name)
                self.assertFalse(web_internals.raw_header_map(headers).get(stored))

    def test_response_encoder(self) -> None:
        """``_IEncodingResource`` and ``request._encoder``: gzip is installed when the client accepts it."""
        resource = EncodingResourceWrapper(Data(b"x" * 100, "text/plain"), [GzipEncoderFactory()])
        plain = Request(DummyChannel())
        web_internals.install_response_encoder(resource, plain)
        self.assertFalse(web_internals.has_response_encoder(plain))
        gzipped = Request(DummyChannel())
        gzipped.requestHeaders.setRawHeaders(b"accept-encoding", [b"gzip"])
        web_internals.install_response_encoder(resource, gzipped)
        self.assertTrue(web_internals.has_response_encoder(gzipped))
        gzipped.write(b"hello")
        gzipped.finish()
        self.assertEqual(gzipped.responseHeaders.getRawHeaders(b"content-encoding"), [b"gzip"])

    def test_http_channel_protocol_and_channel_of(self) -> None:
        """``_GenericHTTPChannelProtocol`` and its ``_channel``: the site's protocol serves with our channel."""
        resource = _Slow()
        site = Site(resource, reactor=Clock())
        channel = HTTPChannel()
        channel.site, channel.requestFactory = site, site.requestFactory
        protocol = web_internals.http_channel_protocol(channel)
        self.assertIs(web_internals.channel_of(protocol), channel)
        protocol.factory = site
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual([request.uri for request in resource.requests], [b"/x"])
        self.assertIs(web_internals.channel_of(channel), channel)  # not built by a Site: as it is

    def test_receiving_headers(self) -> None:
        """``_buffer``, ``__first_line``, ``_handlingRequest``, ``_dataBuffer``: a request's headers, told apart."""
        channel, _, resource = _channel()
        self.assertIsNone(web_internals.receiving_headers(channel))  # nothing received
        channel.dataReceived(b"GET /a HTT")
        first = web_internals.receiving_headers(channel)
        self.assertIsNotNone(first)  # a partial request line
        channel.dataReceived(b"P/1.1\r\nHost: a\r\n")
        self.assertIs(web_internals.receiving_headers(channel), first)  # the same request
        channel.dataReceived(b"\r\n")
        self.assertIsNone(web_internals.receiving_headers(channel))  # handled now
        resource.requests[0].finish()
        self.assertIsNone(web_internals.receiving_headers(channel))  # idle keep-alive
        channel.dataReceived(b"GET /b HTTP/1.1\r\n")
        second = web_internals.receiving_headers(channel)
        self.assertIsNotNone(second)
        self.assertIsNot(second, first)  # the next request

    def test_continue_veto(self) -> None:
        """``HTTPChannel._send100Continue``: a channel may decline to invite the body."""

        class Refusing(web_internals.ContinueVetoChannel):
            def continue_refused(self) -> bool:
                return True

        expecting = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        for channel_class, invited in ((web_internals.ContinueVetoChannel, True), (Refusing, False)):
            channel, transport, _ = _channel(channel_class)
            channel.dataReceived(expecting)
            self.assertEqual(b"100 Continue" in transport.value(), invited, channel_class)

    def test_quiet_connection_pool(self) -> None:
        """``HTTPConnectionPool._factory`` and ``_HTTP11ClientFactory``: the pool's connections are not noisy."""
        pool = web_internals.quiet_connection_pool(HTTPConnectionPool(MemoryReactorClock(), persistent=True))
        factories: list[Any] = []

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                factories.append(factory)
                return Deferred()

        pool.getConnection(("http", b"backend", 80), Endpoint())
        [factory] = factories
        self.assertFalse(factory.noisy)


class ReactorInternalsTests(SynchronousTestCase):
    def test_internal_readers(self) -> None:
        """A reader added as internal stays through removeAll (what trial and shutdown call) until removed."""
        from twisted.internet.pollreactor import PollReactor

        reactor = PollReactor()  # not installed: only its reader bookkeeping is used
        self.addCleanup(reactor.removeReader, reactor.waker)
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)

        @implementer(IReadDescriptor)
        class Reader:
            def fileno(self) -> int:
                return read_end

            def doRead(self) -> None: ...

            def connectionLost(self, reason: object) -> None: ...

            def logPrefix(self) -> str:
                return "test"

        reader = Reader()
        self.assertTrue(web_internals.can_add_internal_reader(reactor))
        self.assertFalse(web_internals.can_add_internal_reader(MemoryReactorClock()))
        web_internals.add_internal_reader(reactor, reader)
        self.assertNotIn(reader, reactor.removeAll())
        self.assertIn(reader, reactor.getReaders())
        web_internals.remove_internal_reader(reactor, reader)
        self.assertNotIn(reader, reactor.getReaders())


class ChannelSwitchTests(SynchronousTestCase):
    def test_channel_switch(self) -> None:
        """``_GenericHTTPChannelProtocol``'s ``_channel``, ``_negotiatedProtocol`` and ``_site``, read by name."""
        resource = _Slow()
        site = Site(resource, reactor=Clock())
        channel = HTTPChannel()
        channel.site, channel.requestFactory = site, site.requestFactory
        switch = web_internals.ChannelSwitch(channel)
        switch.factory = switch.site = site  # what Site.buildProtocol sets
        self.assertIsNone(switch.negotiated)
        self.assertIs(switch.current_channel, channel)
        self.assertIs(switch.owning_site, site)
        switch.makeConnection(StringTransport())
        switch.dataReceived(b"GET /s HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(switch.negotiated, b"http/1.1")
        self.assertEqual([request.uri for request in resource.requests], [b"/s"])

    def test_transport_aborted(self) -> None:
        """TLS's ``_aborted``: set by ``abortConnection``."""
        from twisted.internet.protocol import Factory, Protocol
        from twisted.protocols.tls import TLSMemoryBIOFactory

        try:
            from twisted.internet.ssl import CertificateOptions
        except ImportError:
            self.skipTest("needs pyOpenSSL: pip install 'twisted[tls]'")
        factory = TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Protocol))
        tls = factory.buildProtocol(None)
        tls.makeConnection(StringTransport())
        self.assertFalse(web_internals.transport_aborted(tls))
        tls.abortConnection()
        self.assertTrue(web_internals.transport_aborted(tls))
        self.assertFalse(web_internals.transport_aborted(StringTransport()))


class HTTP2InternalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        try:
            import h2.config
            import h2.connection
            from twisted.web._http2 import H2Connection
        except ImportError:
            self.skipTest("needs h2: pip install 'twisted[http2]'")
        self.clock = Clock()
        self.resource = _Slow()
        self.server = H2Connection(self.clock)
        self.server.site = Site(self.resource, reactor=self.clock)
        self.server.requestFactory = self.server.site.requestFactory
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        headers = [(":method", "GET"), (":path", "/s"), (":scheme", "https"), (":authority", "a")]
        self.client.send_headers(1, headers, end_stream=True)  # a whole request, rendered
        self.client.send_headers(3, headers, end_stream=False)  # its body still to come: not rendered yet
        self.server.dataReceived(self.client.data_to_send())
        self.clock.advance(0)

    def test_stream_requests(self) -> None:
        """``H2Stream._request``: each stream's request, rendered or still receiving."""
        found = sorted(web_internals.stream_requests(self.server), key=lambda pair: pair[1].streamID)
        self.assertEqual([stream.streamID for _, stream in found], [1, 3])
        self.assertIs(found[0][0], self.resource.requests[0])
        self.assertEqual([request.channel for request, _ in found], [stream for _, stream in found])

    def test_h2_connection_of_and_forget_stream(self) -> None:
        """``H2Stream._conn`` and ``H2Connection._requestDone``: a refused stream is forgotten."""
        [(_, stream)] = [pair for pair in web_internals.stream_requests(self.server) if pair[1].streamID == 3]
        self.assertIs(web_internals.h2_connection_of(stream), self.server)
        self.assertIsNone(web_internals.h2_connection_of(object()))
        self.server.conn.reset_stream(3, 7)  # REFUSED_STREAM
        self.assertTrue(web_internals.flush_h2_control_data(self.server))
        web_internals.forget_h2_stream(self.server, 3)
        self.assertNotIn(3, self.server.streams)

    def test_reset_after_cleanup(self) -> None:
        """``_conn``, ``_streamCleanupCallbacks``, ``_tryToWriteControlData``: a stream reset once Twisted ended it."""
        import h2.events

        [(request, stream)] = [pair for pair in web_internals.stream_requests(self.server) if pair[1].streamID == 3]
        resets: list[int] = []

        def reset(stream_id: int, connection: Any) -> int:
            connection.conn.reset_stream(stream_id, 0)
            web_internals.flush_h2_control_data(connection)
            resets.append(stream_id)
            return stream_id

        self.assertTrue(web_internals.reset_h2_stream_after_cleanup(stream, reset))
        self.transport.clear()
        # Answered before the client's body ended, as the 413 of GuestSite's body limit is.
        stream.writeHeaders(b"HTTP/2", b"413", b"Request Entity Too Large", Headers())
        stream.write(b"too large")
        stream.requestDone(request)
        self.clock.advance(0)
        self.assertEqual(resets, [3])
        events = self.client.receive_data(self.transport.value())
        self.assertIn(h2.events.StreamReset, [type(event) for event in events])
        self.assertFalse(web_internals.reset_h2_stream_after_cleanup(stream, reset))  # forgotten now


class ServiceInternalsTests(SynchronousTestCase):
    def test_forget_options(self) -> None:
        """``usage.Options._dispatch`` and ``shortOpt``: an inherited option and a short name, gone."""

        class Options(usage.Options):
            optFlags = [["notracebacks", "n", "deprecated"]]
            optParameters = [["port", "p", None, "a port"]]

        options = Options()
        service_internals.forget_option(options, "notracebacks")
        service_internals.forget_short_option(options, "n")
        service_internals.forget_short_option(options, "p")
        for argv in (["--notracebacks"], ["-n"], ["-p", "80"]):
            self.assertRaises(usage.UsageError, Options.parseOptions, options, argv)
        options.parseOptions(["--port", "80"])
        self.assertEqual(options["port"], "80")
        self.assertNotIn("notracebacks", options)
        self.assertNotIn("notracebacks", str(options))

    def test_add_headers_resource(self) -> None:
        """``twisted.web.tap._AddHeadersResource``: ``--add-header``'s headers on each response."""
        from twisted.web.test.requesthelper import DummyRequest

        resource = service_internals.add_headers_resource(Data(b"x", "text/plain"), [("X-A", "1")])
        request = DummyRequest([b""])
        child = resource.getChildWithDefault(b"", request)
        self.assertIsNotNone(child)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-a"), [b"1"])

    def test_tcp_endpoint_address(self) -> None:
        """The TCP endpoints' ``_interface``, ``_port`` and ``_backlog``, as ``serverFromString`` parsed them."""
        reactor = MemoryReactorClock()
        for description, expected in (
            ("tcp:8080:interface=127.0.0.1:backlog=7", ("127.0.0.1", 8080, 7)),
            ("tcp6:0:interface=\\:\\:1", ("::1", 0, 50)),
        ):
            endpoint = endpoints.serverFromString(reactor, description)
            self.assertEqual(service_internals.tcp_endpoint_address(endpoint), expected)

    def test_exit_on_usage_error(self) -> None:
        """Before 26.10 twistd exited 0 after a usage error: under twistd, the options exit 1 themselves."""
        import io
        import sys

        class Server(usage.Options):
            optFlags = [["nodaemon", "n", "stay"]]

        parent = Server()
        options = usage.Options()
        error = usage.UsageError("--bad is not an option")
        service_internals.exit_on_usage_error(options, error)  # not under twistd: the caller raises
        options.parent = parent
        self.patch(service_internals, "twisted_version", "26.10.0")
        service_internals.exit_on_usage_error(options, error)  # twistd exits 1 itself
        self.patch(service_internals, "twisted_version", "24.7.0")
        self.patch(sys, "argv", ["twistd", "httpwasm", "--bad"])
        printed = io.StringIO()
        self.patch(sys, "stdout", printed)
        with self.assertRaises(SystemExit) as exited:
            service_internals.exit_on_usage_error(options, error)
        self.assertEqual(exited.exception.code, 1)
        self.assertEqual(printed.getvalue(), f"{parent}\ntwistd httpwasm: --bad is not an option\n")

    def test_endpoint_service(self) -> None:
        """``StreamServerEndpointService._raiseSynchronously`` and ``_waitingForPort``: a bind failure raises at
        start; the port's Deferred fires with the port."""
        from twisted.application.internet import StreamServerEndpointService
        from twisted.internet.error import CannotListenError

        class Refusing:
            def listen(self, factory: Any) -> Deferred[Any]:
                from twisted.internet.defer import fail

                return fail(CannotListenError("127.0.0.1", 1, OSError("in use")))

        class Listening:
            def listen(self, factory: Any) -> Deferred[Any]:
                from twisted.internet.defer import succeed

                return succeed("the port")

        refusing = service_internals.endpoint_service(StreamServerEndpointService(Refusing(), None))
        self.assertRaises(CannotListenError, refusing.privilegedStartService)
        listening = service_internals.endpoint_service(StreamServerEndpointService(Listening(), None))
        listening.privilegedStartService()
        self.assertEqual(self.successResultOf(service_internals.port_deferred(listening)), "the port")
